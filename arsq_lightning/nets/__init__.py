"""Network building blocks shared by every algorithm: ensemble layers, observation encoders, image augmentation."""
