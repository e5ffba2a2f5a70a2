"""A tiny Broden-format folder (4 images, 16 x 16, masks 8 x 8) as a pytest fixture: ``broden``."""
import numpy as np
import pytest
from PIL import Image

LABELS = """number,name,category,frequency,coverage,syns
0,-,,0,0.0,
1,red-c,color(2),2,10.0,
2,sky,object(2),2,20.0,
3,wood,object(1);material(3),4,5.0,timber
300,wheel,part(1),1,2.0,
301,street-s,scene(1),1,100.0,
302,striped,texture(1),1,100.0,
"""
HEADER = "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n"
S = 8  # segmentation side; images are 16 x 16


def _png(path, numbers: np.ndarray):
    rgb = np.zeros((*numbers.shape, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = numbers % 256, numbers // 256
    Image.fromarray(rgb).save(path)


@pytest.fixture
def broden(tmp_path):
    root = tmp_path / "broden1_16"
    (root / "images" / "src").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / "src" / f"{i}.jpg")
    z = lambda: np.zeros((S, S), dtype=np.int64)  # noqa: E731
    color0 = z(); color0[:2] = 1  # red: top 2 rows
    obj0 = z(); obj0[4:, :4] = 2; obj0[4:, 4:] = 3  # sky bottom-left, wood bottom-right
    part0 = z(); part0[0, 0] = 300  # wheel > 255: G = 1, R = 44
    obj1 = z(); obj1[:, :2] = 2
    mat1 = z(); mat1[:, 6:] = 3
    part2a = z(); part2a[:2, :2] = 300
    part2b = z(); part2b[1:3, 1:3] = 300  # overlapping part layers are OR-ed
    color3 = z(); color3[5:] = 1
    for name, arr in dict(color0=color0, obj0=obj0, part0=part0, obj1=obj1, mat1=mat1, part2a=part2a,
                          part2b=part2b, color3=color3).items():
        _png(root / "images" / "src" / f"{name}.png", arr)
    (root / "label.csv").write_text(LABELS)
    (root / "index.csv").write_text(HEADER + "\n".join([
        f"src/0.jpg,train,16,16,{S},{S},src/color0.png,src/obj0.png,src/part0.png,,301,",
        f"src/1.jpg,train,16,16,{S},{S},,src/obj1.png,,src/mat1.png,,302",
        f"src/2.jpg,val,16,16,{S},{S},,,src/part2a.png;src/part2b.png,,,",
        f"src/3.jpg,val,16,16,{S},{S},src/color3.png,,,,,",
    ]) + "\n")
    for c in ("color", "object", "part", "material", "scene", "texture"):
        (root / f"c_{c}.csv").write_text("code,number,name,frequency,coverage\n")
    return root
