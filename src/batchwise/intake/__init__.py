"""Intake: parsing and validating request lines, tolerances, classification and the guards
applied as requests arrive."""
