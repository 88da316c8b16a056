"""Communication: bytes a site sends per round, per aggregation rule, against the full model.

Builds the demo's model (all-MiniLM-L6-v2 + LoRA, bundled) for each rule and LoRA layer
choice and measures the serialized ArrayRecord a site's train reply carries (what Flower
sends), next to the bytes of every parameter of the model. Only `ffa` changes what is sent
(LoRA's A stays at the sites); the other rules send the same tensors as FedAvg.
"""

from __future__ import annotations

from common import md_table, report, status

from fedhaven import protocol
from fedhaven.config import STRATEGIES, Config
from fedhaven.models import adapter_state, build_model, full_model_bytes

LAYERS = {"last layer (default)": "-1", "all six layers": ""}


def main() -> None:
    results = []
    for layers_name, layers in LAYERS.items():
        for rule in STRATEGIES:
            status(f"communication: {rule}, {layers_name}")
            cfg = Config().replace(**{"federation.strategy": rule, "lora.layers": layers})
            model = build_model(cfg)
            sent = protocol.record_nbytes(protocol.to_record(adapter_state(model)))
            full = full_model_bytes(model.get_base_model())
            results.append({"rule": rule, "layers": layers_name, "sent": sent, "full": full})
    # rules that send the same bytes share a row
    groups: dict[tuple[str, int, int], list[str]] = {}
    for r in results:
        groups.setdefault((r["layers"], r["sent"], r["full"]), []).append(r["rule"])
    rows = [
        [", ".join(rules), layers, f"{sent:,}", f"{full:,}", f"{sent / full:.2%}"]
        for (layers, sent, full), rules in groups.items()
    ]
    header = ["rule", "LoRA layers", "bytes per site per round", "full model bytes", "share"]
    report("communication", md_table(header, rows), results=results)


if __name__ == "__main__":
    main()
