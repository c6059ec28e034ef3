"""Your own per-example metrics: name them in params.yaml evaluate.metrics as "scorers.<module>:<function>".

A scorer is function(reply: str, reference: str) -> float, higher is better. Each one is scored on
every test example, averaged into the candidate's metric, resampled by the paired bootstrap, and
can be register.primary_metric (by the function's name). The score_base and evaluate stages
depend on this folder, so editing a scorer here scores the candidates again; a scorer imported
from elsewhere works too, but DVC does not see its edits.
"""
