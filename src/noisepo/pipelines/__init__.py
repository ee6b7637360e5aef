"""The loops (SPIN/DNPO, ROPO) as plain functions over resumable stages."""
