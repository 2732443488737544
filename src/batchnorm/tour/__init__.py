"""The tour: the lesson on Batch Normalization the project grew from, run end to end on real
data (``batchnorm demo``; each section's module says which part of the lesson it runs)."""
