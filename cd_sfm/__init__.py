"""cd_sfm: ContextDesc learned features as a front end for COLMAP."""

__version__ = "0.1.0"
