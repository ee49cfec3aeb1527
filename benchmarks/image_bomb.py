"""Peak RSS of decoding a 13000x13000 PNG of ~20 KB (a decompression bomb) with and without the
pixel limit: `python benchmarks/image_bomb.py none` vs `python benchmarks/image_bomb.py 67108864`."""
import io, resource, sys, time
from PIL import Image
from vermeer_plugins.shards import load_image, ImageTooLarge
b = io.BytesIO(); Image.new("1", (13000, 13000)).save(b, format="PNG"); data = b.getvalue()
Image.MAX_IMAGE_PIXELS = None
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
limit = None if sys.argv[1] == "none" else int(sys.argv[1])
try:
    load_image(data, 256, max_pixels=limit); res = "decoded"
except ImageTooLarge as e: res = "refused"
print(f"file {len(data)} B, max_pixels={limit}: {res} in {time.perf_counter()-t:.2f}s, peak RSS {r0/1024:.0f} -> {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MiB")
