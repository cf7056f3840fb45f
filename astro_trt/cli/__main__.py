"""``python -m astro_trt.cli``: the same entry point as the installed ``astro-trt`` script."""

from astro_trt.cli import main

main()
