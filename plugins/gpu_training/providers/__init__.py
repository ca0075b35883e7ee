"""Compute providers behind one narrow interface (``providers.base.ComputeProvider``)."""
