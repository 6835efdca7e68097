"""The launcher with deterministic second views, for the 1 vs 2 vs 4-process training test.

The plugin's second image view (random crop + flip) and EDA caption are drawn from each data
process's own random stream, so runs on different numbers of processes see different views. Here
the second view is a fixed function of the sample (centre crop, resized back, mirrored) and the
text view a fixed rewording, so the global batch, views included, is the same on any number of
processes. Test-only: it replaces the name the model hook calls (openclip_structure.integration.model)
and an entry of openclip_structure.views.text's table, never a name in a library.
"""
import sys

from torchvision import transforms as T

from openclip_structure.integration import model as model_hook
from openclip_structure.views import image as views
from openclip_structure.views import text as text_views
from openclip_structure.main import main


def fixed_view_transform(base, kind="crop", image_size=None):
    normalize = views._find(base, T.Normalize)
    size = views._find(base, T.RandomResizedCrop).size
    return T.Compose([views._ToRGB(), T.CenterCrop(24), T.Resize(size), T.RandomHorizontalFlip(p=1.0),
                      T.ToTensor(), T.Normalize(normalize.mean, normalize.std)])


def fixed_text_pair():
    return lambda text, rng=None: (text, "a picture: " + text)


model_hook.augmented_view_transform = fixed_view_transform
text_views.TEXT_VIEW_PAIRS["eda"] = fixed_text_pair

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
