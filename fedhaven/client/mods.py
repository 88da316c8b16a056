"""Flower client mods of the site (``msg, ctxt, call_next``)."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Error, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedhaven import protocol
from fedhaven.models import at_rank, lora_rank

log = logging.getLogger(__name__)


def allowlist_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply leave the site only if it holds nothing outside the allow-list.

    Train replies: exactly the adapter tensors the coordinator sent (same keys and shapes; the
    LoRA pairs may all come at one lower rank, a flexlora site's own), plus allow-listed
    metrics; evaluate replies: allow-listed metrics only. Anything else
    becomes an error reply that carries the reason and none of the content.
    """
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    train = msg.metadata.message_type == MessageType.TRAIN
    sent = msg.content.get(protocol.ARRAYS)
    expected = protocol.shapes(sent) if train and sent else None
    arrays = reply.content.get(protocol.ARRAYS)
    if expected is not None and isinstance(arrays, ArrayRecord):
        rank, sent_rank = lora_rank(protocol.shapes(arrays)), lora_rank(expected)
        if rank is not None and sent_rank is not None and 1 <= rank < sent_rank:
            expected = at_rank(expected, rank)  # never more numbers than were sent
    try:
        protocol.check_reply(reply.content, train=train, expected=expected)
    except ValueError as e:
        log.error("allowlist_mod: reply withheld: %s", e)
        return Message(
            Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"reply withheld: {e}"),
            reply_to=msg,
        )
    return reply


def central_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping, on the train rounds whose config asks for it.

    Central DP with client-side clipping sends the bound in the train config; the update
    (reply minus what was sent) is clipped to it before it leaves. With adaptive clipping the
    reply also says whether the update was within the bound. Otherwise: a no-op.
    """
    config = msg.content.get(protocol.CONFIG)
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or config is None
        or protocol.CLIPPING_NORM not in config
    ):
        return call_next(msg, ctxt)
    mod = adaptiveclipping_mod if config.get(protocol.ADAPTIVE_CLIPPING) else fixedclipping_mod
    return mod(msg, ctxt, call_next)
