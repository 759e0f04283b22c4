"""The one image reader (data.load_image): every mode scaled to 8-bit RGB, never clipped, transparency on grey,
and a decompression bomb refused with a message."""
import numpy as np
from PIL import Image
import pytest

import data


# ---- the one image reader (issue 13: every mode scaled, never clipped; no decompression bomb) ---------------

def test_image_modes_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint32) * 257).reshape(16, 16)            # 0 .. 65535, a 16-bit gradient

    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "g16.png")
    got = np.asarray(data.load_image(tmp_path / "g16.png"))
    assert got.shape == (16, 16, 3) and got[..., 0].ravel().tolist() == list(range(256))   # 65535 -> 255
    Image.fromarray((ramp / 65535.0).astype(np.float32), "F").save(tmp_path / "f.tiff")
    assert np.asarray(data.load_image(tmp_path / "f.tiff"))[..., 1].ravel().tolist() == list(range(256))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)                                             # one opaque red pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(data.load_image(tmp_path / "a.png"))
    assert got[0, 0].tolist() == [255, 0, 0] and got[1, 1].tolist() == list(data.GREY)
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "p.png")
    assert np.asarray(data.load_image(tmp_path / "p.png"))[0, 0].tolist() == [255, 0, 0]
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tiff")
    assert np.asarray(data.load_image(tmp_path / "c.tiff"))[0, 0].tolist() == [255, 0, 0]

def test_decompression_bomb_is_refused_with_a_message(tmp_path):
    import struct
    import zlib


    Image.new("L", (1, 1)).save(tmp_path / "bomb.png")
    raw = bytearray((tmp_path / "bomb.png").read_bytes())
    raw[16:24] = struct.pack(">II", 20000, 20000)                             # IHDR width and height
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))             # the chunk's CRC
    (tmp_path / "bomb.png").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="too large to open safely"):
        data.load_image(tmp_path / "bomb.png")
