"""The bundled example cluster (rtb-pricing) and the quickstart demo."""
