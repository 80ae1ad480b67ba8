"""Planning: what to do to a model and in what order — targets and budgets, rank allocation, recipes,
the searches that judge results by running them, and the run itself (:mod:`onnxlr.planning.optimizer`)."""
