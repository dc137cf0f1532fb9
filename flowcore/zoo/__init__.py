"""The zoo: checkpoint folders (save, load, find) and fetching shipped models from a mirror."""
