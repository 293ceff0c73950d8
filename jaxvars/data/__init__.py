"""Datasets (tensorflow-datasets builders), interaction splitting and sampling."""
