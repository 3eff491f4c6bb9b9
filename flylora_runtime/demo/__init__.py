"""The demo: the demo base model (:mod:`.model`), the three demo tasks (:mod:`.tasks`), their trained
adapters (:mod:`.trained`), the evaluation (:mod:`.evaluate`) and the demo CLI (:mod:`.cli`).
"""
