"""fedhaven: federated, differentially private LoRA fine-tuning on Flower."""

from fedhaven.errors import FedhavenError

__all__ = ["FedhavenError"]
__version__ = "0.1.0"
