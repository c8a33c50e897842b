"""Benchmarks: ``hpatches`` (MMA / matching score on homography sequences, RootSIFT vs learned descriptors on the
same SIFT keypoints) and the other evaluation modules of this package. Evaluation scenes are listed in
``configs/split.yaml`` and are never used for training or tuning."""
