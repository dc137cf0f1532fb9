"""OOD detection: scores, reference statistics, AUROCs and evaluation, flows on features, and scoring files."""
