"""Flower client mods of the site (``msg, ctxt, call_next``)."""

from __future__ import annotations

import logging
from copy import copy

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

from fedhaven import protocol
from fedhaven.errors import FedhavenError
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


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` on the training rounds the coordinator runs as SecAgg+
    (their messages carry :data:`fedhaven.protocol.SECAGG`); any other message passes by.

    SecAgg+ sends the round's instruction in Flower's legacy ``fit`` records: the site's
    train handler (and the mods inside this one) see it as an ordinary train message, and its
    reply goes back as legacy ``fitres`` records for Flower's mod to weigh, quantise and mask.
    What leaves the site is then checked against the SecAgg+ allow-list (one stage's keys;
    with the masked vector, allow-listed metrics and no tensor).
    """
    secagg = msg.content.config_records.get(protocol.SECAGG)
    if msg.metadata.message_type != MessageType.TRAIN or secagg is None:
        return call_next(msg, ctxt)
    stage = str(secagg.get(protocol.SECAGG_STAGE))  # before Flower's mod pops it
    reply = secaggplus_mod(msg, ctxt, _legacy_fit(call_next))
    try:
        protocol.check_secagg_reply(reply.content, stage)
    except ValueError as e:
        log.error("secure_aggregation_mod: reply withheld: %s", e)
        return Message(
            Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"reply withheld: {e}"),
            reply_to=msg,
        )
    return reply


def _legacy_fit(call_next: ClientAppCallable) -> ClientAppCallable:
    """``call_next`` between Flower's legacy fit records and fedhaven's train messages."""

    def fit(msg: Message, ctxt: Context) -> Message:
        content, keys, weight_key = protocol.from_legacy_fit_ins(msg.content)
        inner = copy(msg)  # same metadata, the instruction in the shape the handler reads
        inner.content = content
        reply = call_next(inner, ctxt)
        if reply.has_error():  # Flower's mod has no error path: it becomes the ClientApp's
            raise FedhavenError(reply.error.reason)
        state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
        weight = float(reply.content[protocol.METRICS][weight_key])
        # Flower's mod clips w·x to ±clipping_range silently: a wrong mean. Refuse instead.
        if weight > state.max_weight:
            raise FedhavenError(
                f"secure aggregation: this site's weight {weight:g} exceeds "
                f"federation.secagg-max-weight = {state.max_weight:g}: raise it"
            )
        ratio = weight / state.max_weight
        for k, a in reply.content[protocol.ARRAYS].items():
            peak = float(np.abs(a.numpy()).max(initial=0.0)) * ratio
            if peak > state.clipping_range:
                raise FedhavenError(
                    f"secure aggregation: tensor '{k}' weighted reaches {peak:.3g}, beyond "
                    f"federation.secagg-clip = {state.clipping_range:g}: raise it"
                )
        return Message(protocol.legacy_fit_res(reply.content, keys, weight_key), reply_to=msg)

    return fit
