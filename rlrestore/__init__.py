"""rlrestore: distributed RL post-training (Pref-Restore) for blind face restoration on Ray."""

__version__ = "0.1.0"
