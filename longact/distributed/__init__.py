"""Distribution layer: the saliency coordinator (a Ray actor at run time)."""
