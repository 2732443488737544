"""The tour: the lesson (../shared/SEED.md) run end to end on real data."""
