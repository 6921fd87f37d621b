"""Identity separator: one all-ones mask per SpecFrames message, for the label "mix".

The reference for "an identity mask reconstructs the input": it has the contract of the model
separator (SpecFrames in; Masks with the mixture frames they apply to out; EndOfStream passed
on) with no model and no lookahead.
"""

from __future__ import annotations

import numpy as np

from engine.messages import EndOfStream, Masks, Message, SpecFrames
from engine.node import Node, Outputs


class IdentitySeparator(Node):
    """SpecFrames (F, t) -> Masks of ones (1, F, t) labelled ``label``."""

    inputs = {"spec": "pull"}
    outputs = {"masks": "push"}

    def __init__(self, *, label: str = "mix") -> None:
        super().__init__()
        self.label = label

    def handle(self, port: str, msg: Message) -> Outputs:
        """SpecFrames -> Masks; EndOfStream passes through."""
        if isinstance(msg, SpecFrames):
            yield "masks", Masks(
                stream=msg.stream, frame_index=msg.frame_index, labels=[self.label],
                masks=np.ones((1, *msg.spec.shape), np.float32), mixture=msg.spec,
            )
        elif isinstance(msg, EndOfStream):
            yield "masks", msg
