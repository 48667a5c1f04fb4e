"""Tools for the embedded model (not imported by the trainer's core): pre-training the tiny SD3 model and
the toy perceptual encoder on the shapes world (:mod:`trainer.world`), evaluating them, and their CLI
(``pec toy ...``). The model's recipe is :mod:`trainer.toy.model`."""
