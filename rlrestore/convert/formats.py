"""The checkpoint formats ``rlrestore convert`` reads: members of the BLIP3o family, which differ only
in the texture path (kept light: the CLI lists them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Blip3oFormat:
    """How one member of the BLIP3o family maps onto the policy."""

    name: str
    repo: str  # Hugging Face repo of the released checkpoint (the default SRC)
    has_vae_connector: bool  # False: the vae connector starts fresh
    lq_encoder_trained: bool  # True: model.sana_vae.encoder is the fine-tuned LQ encoder E_theta
    tie_connector_norms: bool  # True: their model class gives both connectors one RMSNorm
    summary: str


# The released Pref-Restore Stage-1 ("Fidelity") model (code: github.com/zjYao36/Pref_Restore), built on
# BLIP3o-NEXT-SFT-3B. Beyond BLIP3o-NEXT it has the texture connector model.vae_connector, a fine-tuned LQ
# encoder in model.sana_vae.encoder, and may carry fixed_vae.*, the frozen DC-AE its Stage 1.2 encodes
# clean faces with (else that encoder is read from the base SANA folder).
PREF_RESTORE = Blip3oFormat(
    name="pref-restore",
    repo="zjyao-PKU/Pref-Restore-PhaseA-Fidelity",
    has_vae_connector=True,
    lq_encoder_trained=True,
    tie_connector_norms=True,
    summary="the released Pref-Restore Stage-1 model",
)

# BLIP3o-NEXT (code: github.com/JiuhaiChen/BLIP3o), the text-to-image model Pref-Restore starts from: the
# same layout without the texture path. Its DC-AE encoder is SANA's own, so it becomes both the clean-face
# encoder and the starting LQ encoder; the vae connector starts fresh (Pref-Restore's Stage 1.2 trains it).
BLIP3O_NEXT = Blip3oFormat(
    name="blip3o-next",
    repo="BLIP3o/BLIP3o-NEXT-SFT-3B",
    has_vae_connector=False,
    lq_encoder_trained=False,
    tie_connector_norms=False,
    summary="BLIP3o-NEXT, the base model of Pref-Restore",
)

FORMATS: dict[str, Blip3oFormat] = {fmt.name: fmt for fmt in (PREF_RESTORE, BLIP3O_NEXT)}
