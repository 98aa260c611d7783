"""Networks: UNet (diffusion / regression / pix2pix generator), discriminators, StainNet, InceptionV3 for FID.

May import: base modules and io. Never diffusion/ (the network never owns the noise process) or anything above."""
