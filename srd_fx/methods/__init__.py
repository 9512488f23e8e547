"""Methods built on SRD: APOP (``apop``), ERFs and nearest-PFV concepts (``concepts``) and the
explanation-manipulation attack (``robustness``)."""
