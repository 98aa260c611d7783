"""Networks: UNet (diffusion / regression / pix2pix generator), discriminators, StainNet."""
