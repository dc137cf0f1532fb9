"""The dashboard pages (Streamlit scripts, run by the navigation in ``Home.py``)."""
