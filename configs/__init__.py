"""The Hydra config tree of swinv2-train, shipped inside the package (pkg://swinv2_train.configs)."""
