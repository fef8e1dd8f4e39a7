"""fastlora on Flower: a tiny federated LoRA app (see ../README.md)."""
