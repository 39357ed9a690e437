"""Training and demos of the generalist model: the entry points (`pretrain`, `classify`), the engine they share
(`launch.training`) and the built-in recipes (`launch/recipes/*.yaml`, shipped as package data)."""
