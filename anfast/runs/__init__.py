"""What a run is on disk and across processes, below the trainer and the search.

rundir (the run directory, its lock, what a resume may continue), checkpoint (atomic
files, RNG state), records (metrics.jsonl, plots), distributed (torchrun ranks),
schedule (the learning rate), pretrained (weights into an adjoined network), errors
(the ones a user fixes). ``anfast train`` and ``anfast search`` both stand on it.
"""
