"""Training: phantom datasets read through the service's own intake and preprocessing."""
