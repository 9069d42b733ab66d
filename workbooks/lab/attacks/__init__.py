"""Attack code of our own, where ART cannot do what an experiment needs (each module says why
and carries a parity test). The lab's attacks otherwise come from ART through
``lab.estimators``; query routing lives in ``lab.routing``."""
