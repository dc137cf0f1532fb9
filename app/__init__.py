"""The flowcore dashboard (Streamlit): ``streamlit run app/Home.py`` or ``flowcore app``."""
