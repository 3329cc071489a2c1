"""The commands (`python driver.py`, `opd <command>`, `python -m opd.programs.<name>`).

A process that ran one ends sooner: at exit the interpreter's last garbage collections walk every object that
torch and transformers made at import, ~1.2 s of a 2-core CPU per process (measured: `import torch, transformers
.models.auto.auto_factory` then exit, 1.55 s -> 0.34 s). gc.freeze() moves them out of the collector's reach;
registered first, it runs after every other exit handler (atexit's order is last in, first out), so the trackers'
and Ray's handlers run as before. Objects are still freed by reference counting; only cycles left at exit are not
collected, as CPython does not promise to finalise those either."""

import atexit
import gc

atexit.register(gc.freeze)
