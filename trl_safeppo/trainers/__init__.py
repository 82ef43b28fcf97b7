"""Trainers: SafePPO / SafeGRPO / SafeDPO, thin wiring of the rails into TRL stable trainers (import the submodules)."""
