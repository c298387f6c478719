"""Azure Personalizer compatibility: feature conversion, the configuration mapping onto a
policy, and the DSJSON warm-start import. The HTTP facade is ``bandit_service.api.personalizer``.
"""
