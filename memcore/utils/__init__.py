"""Small shared utilities (profiling ranges, timing)."""

import threading

#: Held while a diffusers scheduler module's ``randn_tensor`` is swapped for memcore's noise (the sampling
#: engine's seeded step noise, the reference step's given noise): the name is a module global, so two threads
#: swapping it at once could leave the other's stand-in installed for good.
DIFFUSERS_RANDN_LOCK = threading.RLock()  # re-entrant: a nested swap in one thread must not deadlock
