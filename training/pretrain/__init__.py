"""Pre-training of ReFound (paper 4.2, A.2.1): engine, data pipeline, DDP, logging, plots.

Entry points: :func:`training.pretrain.engine.train` with a
:class:`training.pretrain.engine.TrainConfig`, or the ``refound pretrain`` command.
"""
