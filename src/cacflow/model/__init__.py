"""The coronary calcium network, its preprocessing contract and inference engines."""
