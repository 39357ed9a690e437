"""The image-text retrieval demo: an index of pictures, video frames and detected regions on disk (SQLite + FAISS),
searched by text or by an example picture."""
