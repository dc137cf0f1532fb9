"""Data and images: the datasets (files, official downloads), decoding and preprocessing of user images, tabular
sets and the ImageNet feature extractor of Sec. 8. Builds on :mod:`flowcore.flows` at most."""
