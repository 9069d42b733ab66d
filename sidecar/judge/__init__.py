"""Pure judgment: perceptual hashes, low-pass distances, the decision, output policies. No I/O."""
