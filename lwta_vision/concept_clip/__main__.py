"""``python -m lwta_vision.concept_clip --out DIR``: train the concept CLIP (see lwta_vision.concept_clip.train)."""
from lwta_vision.concept_clip.train import main

if __name__ == "__main__":
    main()
