"""The pruning methods minisnip compares SNIP with, one plain module each (no registry: the command line maps
names to modules in one literal dict). Each module has STRUCTURED, USES_DISTILLATION, DESCRIPTION, a `Config`
dataclass, `training_hooks`, `before_removal` and, for structured methods, `scores`; optionally `select` (its own
selection) and `check` (what it refuses, found before any training or writing); the shared recipe is
`minisnip.pruning.recipe`.

    magnitude.py               structured magnitude: heads / FFN neuron groups by the L2 norm of their weights
    magnitude_unstructured.py  gradual magnitude pruning of single weights (Zhu & Gupta 2017, cubic schedule)
    movement.py                movement pruning of single weights, hard (Top_v) and soft (threshold + penalty)
                               (Sanh, Wolf & Rush, NeurIPS 2020)
    movement_structured.py     movement scores on heads and FFN neuron groups, through the gates
    sparsebert.py              knowledge-aware sparse pruning: gradual magnitude pruning with distillation from
                               the fine-tuned teacher (Xu, Yen, Zhao & Xiao, NAACL 2021)
    l0.py                      L0 gates on heads and neuron groups with a Lagrangian (Louizos et al. 2018; CoFi)
    heads.py                   gradient head importance (Michel, Levy & Neubig, NeurIPS 2019)
    dsp.py                     differentiable subset pruning of heads (Li, Cotterell & Sachan, TACL 2021)

Shared parts live in `minisnip.pruning`: the sparsity schedule (schedule.py), distillation (distill.py), gates
(gates.py), branch names (branches.py) and selection (select.py).
"""
