"""The custom losses sessions created: loss_id → its checked graph, for that session only.

`create_custom_loss` checks the uploaded graph at once (engine/custom_loss.py) and keeps it
here; a forward_backward with `loss_fn="custom"` names it by `loss_id`, and the service swaps
the id for the graph before the call goes to the engine. A loss lives as long as its session
(like the SDK's LossHandle), in memory: a restarted server has ended every session anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tinkerd.loss_graph import LossGraph, parse_loss
from tinkerd.types import UserError

# Losses one session may hold: each is small (at most MAX_NODES nodes), but a client that
# creates losses in a loop must not grow the server without bound.
MAX_LOSSES_PER_SESSION = 256


@dataclass(frozen=True)
class CreatedLoss:
    loss_id: str
    session_id: str
    graph: LossGraph
    definition: tuple  # what was uploaded, to tell a retry from a different loss with the same seq id


class CustomLosses:
    def __init__(self) -> None:
        self._losses: dict[str, CreatedLoss] = {}

    def create(self, session_id: str, seq_id: Any, name: Any, inputs: Any, graph: Any) -> str:
        """The new loss's id; CustomLossError (a 400) names what the server refuses."""
        if type(seq_id) is not int or seq_id < 0:
            raise UserError("custom_loss_seq_id must be an integer >= 0", field="custom_loss_seq_id")
        loss_id = f"{session_id}:loss:{seq_id}"
        definition = (repr(name), repr(inputs), repr(graph))
        existing = self._losses.get(loss_id)
        if existing is not None:
            if existing.definition != definition:
                raise UserError(f"custom_loss_seq_id {seq_id} already names another loss of this session",
                                field="custom_loss_seq_id")
            return loss_id  # the SDK sent the same request again
        if sum(1 for loss in self._losses.values() if loss.session_id == session_id) >= MAX_LOSSES_PER_SESSION:
            raise UserError(f"a session may create at most {MAX_LOSSES_PER_SESSION} custom losses")
        self._losses[loss_id] = CreatedLoss(loss_id, session_id, parse_loss(name, inputs, graph), definition)
        return loss_id

    def graph_for(self, loss_id: Any, session_id: str) -> LossGraph:
        """The graph of a loss the session created; a user error for any other id."""
        if not isinstance(loss_id, str) or not loss_id:
            raise UserError("loss_fn 'custom' needs loss_fn_config {'loss_id': ...} from create_custom_loss",
                            field="loss_fn_config")
        loss = self._losses.get(loss_id)
        if loss is None or loss.session_id != session_id:
            raise UserError(f"unknown loss_id {loss_id[:120]!r}: a custom loss can only be used by the session "
                            "that created it", field="loss_fn_config")
        return loss.graph

    def drop_session(self, session_id: str) -> None:
        for loss_id in [k for k, loss in self._losses.items() if loss.session_id == session_id]:
            del self._losses[loss_id]
