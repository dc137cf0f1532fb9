"""The flowcore dashboard (Streamlit): ``streamlit run flowcore/dashboard/Home.py`` or ``flowcore app``."""
