"""Views: what a person looks at. circuitsvis views (meta_gradients, attention),
matplotlib figures (figures, heatmaps), the Jinja2 report (report, run_data, page and
templates/). ``from icl_lens.views import viz`` gives every view in one namespace."""
